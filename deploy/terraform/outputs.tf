output "cluster_name" {
  value = aws_eks_cluster.main.name
}

output "postgres_endpoint" {
  description = "host:port for the medimg-postgres Secret's URLs (sslmode=verify-full)."
  value       = aws_db_instance.postgres.endpoint
}

output "postgres_master_secret_arn" {
  value = aws_db_instance.postgres.master_user_secret[0].secret_arn
}

output "redis_endpoint" {
  description = "Primary endpoint for the medimg-redis Secret's rediss:// URL."
  value       = aws_elasticache_replication_group.redis.primary_endpoint_address
}

output "redis_auth_secret_arn" {
  value = aws_secretsmanager_secret.redis_auth.arn
}

output "data_bucket" {
  value = aws_s3_bucket.data.bucket
}

output "efs_file_system_id" {
  description = "For the efs StorageClass (EFS CSI driver) the prod overlay's volumes use."
  value       = aws_efs_file_system.shared.id
}

output "service_role_arns" {
  description = "eks.amazonaws.com/role-arn annotations of the ingest, training and inference service accounts."
  value       = { for name, role in aws_iam_role.service : name => role.arn }
}

output "ecr_repositories" {
  value = { for name, repo in aws_ecr_repository.service : name => repo.repository_url }
}
